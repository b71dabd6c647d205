"""Resource manager: leased counting semaphores at three tiers, boot limiter, FIFO admission."""

from megaflow.resources.semaphore import LeaseSemaphore

__all__ = ["LeaseSemaphore"]
