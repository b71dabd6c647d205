"""Elastic fleet: an autoscaler over a provider interface, automatic execution mode, utilisation and cost."""
