"""distinf: training-data attribution by dropout-compressed influence functions."""

from distinf.api import AttributionResult, attribute

__all__ = ["attribute", "AttributionResult"]
__version__ = "0.1.0"
