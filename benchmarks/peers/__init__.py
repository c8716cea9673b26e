"""Against the peers: bergson, LogIX, dattri, TRAK and kronfluence in their own environment (.venv-peers)."""
