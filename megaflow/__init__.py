from megaflow.settings import Settings
