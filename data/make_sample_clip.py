"""Synthesise ``data/sample.mp4``: a short test clip with a sound track, made from nothing but code.

A coloured disk crosses a slowly shifting gradient while a 220 -> 880 Hz chirp plays. The clip exists so that the data
pipeline, the audio-preserving post-processing and the end-to-end tests have a real H.264 + AAC file to work on
without shipping third-party footage. Encoded with the ffmpeg binary bundled in imageio-ffmpeg (no system ffmpeg).

    python data/make_sample_clip.py                      # writes data/sample.mp4 (48 frames, 24 fps, 256x256, 2 s)
    python data/make_sample_clip.py --output /tmp/x.mp4 --num_frames 24
"""

import argparse
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np


def make_frames(num_frames: int, size: int) -> np.ndarray:
    """Return ``(num_frames, size, size, 3)`` uint8 RGB frames: a disk moving left to right over a gradient."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        # Background: diagonal gradient whose colours drift with time, so consecutive frames differ everywhere.
        background = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y * (1 - t), 0.8 - 0.5 * x * y + 0.2 * t], axis=-1)
        # Foreground: an orange disk crossing the frame on a gentle arc.
        centre_x, centre_y = 0.15 + 0.7 * t, 0.5 - 0.2 * np.sin(np.pi * t)
        disk = (x - centre_x) ** 2 + (y - centre_y) ** 2 < 0.12**2
        background[disk] = (1.0, 0.55, 0.1)
        frames[i] = np.clip(background * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames


def write_clip(frames: np.ndarray, fps: int, output: Path) -> None:
    """Encode ``frames`` as H.264 (yuv420p) with an AAC chirp of the same duration into an MP4 file."""
    num_frames, height, width, _ = frames.shape
    duration = num_frames / fps
    # Linear chirp 220 -> 880 Hz over the clip: phase = 2*pi*(f0*t + (f1 - f0) / (2*T) * t^2).
    chirp = f"0.3*sin(2*PI*(220*t+{(880 - 220) / (2 * duration)}*t*t))"
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        "-f", "lavfi", "-i", f"aevalsrc={chirp}:s=44100:d={duration}",
        "-map", "0:v", "-map", "1:a",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23", "-preset", "medium",
        "-c:a", "aac", "-b:a", "64k",
        # Reproducible bytes: no encoder/version strings or timestamps in the container.
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
        "-movflags", "+faststart",
        str(output),
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, input=frames.tobytes(), check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "sample.mp4")
    parser.add_argument("--num_frames", type=int, default=48)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--size", type=int, default=256, help="width and height in pixels (even)")
    args = parser.parse_args()
    write_clip(make_frames(args.num_frames, args.size), args.fps, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
