"""SWE-bench on MegaFlow: the official harness's test specs, parsers and grading, run through an env host.

Plug-in layer: imports megaflow.core (and the env host it is handed), never services or workers.
Modules: harness (the swebench package, lazily), rows (dataset families), evalscript (scripts for
rows without one), runner (in-container steps), grade (one patch, one container), layout (run
files and summary), images (instance image names and local builds).
"""
