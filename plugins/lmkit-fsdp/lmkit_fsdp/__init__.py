"""lmkit-fsdp: FSDP2 and FSDP x tensor parallelism for lmkit, applied to models from outside.

Installed, it registers the strategies ``fsdp`` and ``fsdp_tp`` (``strategy=fsdp``) and
their config files through lmkit's plugin hooks (entry point ``fsdp = "lmkit_fsdp.plugin"``).
"""
__version__ = "0.1.0"
