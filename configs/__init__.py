"""Config files: `base.py` holds every default; each regime file overrides a few.

Installed as `tl_keras.configs` (setup.cfg), so that a config file anywhere
imports `from tl_keras.configs import base`; `tools/finetune.py --config=FILE`
reads any of them.
"""
