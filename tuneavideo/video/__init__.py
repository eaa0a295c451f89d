"""Reading clips, choosing their frames, writing videos and putting the sound back."""
