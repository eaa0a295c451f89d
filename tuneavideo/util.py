"""The original project's helper names, kept so its notebooks and scripts run unchanged."""

from .inversion import ddim_inversion
from .video_io import save_videos_grid

__all__ = ["ddim_inversion", "save_videos_grid"]
