"""The original project's helper names, kept so its notebooks and scripts run unchanged."""

from .pipelines.inversion import ddim_inversion
from .video.writers import save_videos_grid

__all__ = ["ddim_inversion", "save_videos_grid"]
