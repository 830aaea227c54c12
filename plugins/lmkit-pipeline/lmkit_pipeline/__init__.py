"""lmkit-pipeline: pipeline parallelism for lmkit (``strategy=pipeline``), on torch.distributed.pipelining."""
from lmkit_pipeline.config import SCHEDULES, PipelineConfig

__version__ = "0.1.0"
__all__ = ["PipelineConfig", "SCHEDULES", "__version__"]
