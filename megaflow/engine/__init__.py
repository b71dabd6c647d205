"""The engine layer: episode state machine (Lua compare-and-set), resource manager, admission.

It sends work through the Dispatcher interface and never imports Celery.
"""
