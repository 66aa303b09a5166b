"""Training data: the st2v_shapes and video-folder TFDS builders, and the input pipeline."""
