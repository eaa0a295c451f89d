from .pipeline_tuneavideo import TuneAVideoPipeline, TuneAVideoPipelineOutput

__all__ = ["TuneAVideoPipeline", "TuneAVideoPipelineOutput"]
