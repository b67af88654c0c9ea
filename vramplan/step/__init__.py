"""The one training step that simulate, profile and train all run (see `build.py`)."""
