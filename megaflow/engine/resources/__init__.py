"""Resource manager: leased counting semaphores at three tiers, boot limiter, FIFO admission."""

from megaflow.engine.resources.manager import Admission, ResourceManager
from megaflow.engine.resources.semaphore import LeaseSemaphore

__all__ = ["Admission", "LeaseSemaphore", "ResourceManager"]
