"""How much memory and disk: peak RSS per worker, reducer and driver, bytes of the gradient files."""
