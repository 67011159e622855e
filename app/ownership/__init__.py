"""Objects the upstream keeps (files, batches, vector stores, stored responses, …) belong to the gateway
key that created them."""

from app.ownership.access import Caller, Plan, admit, body_check, caller
from app.ownership.store import OwnerStore

__all__ = ["Caller", "OwnerStore", "Plan", "admit", "body_check", "caller"]
