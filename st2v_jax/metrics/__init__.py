"""The paper's evaluation metrics (Table 1): MAWE (`mawe`, with the RAFT-large flow of
`raft`), SCuts (`scene_cuts`) and the CLIP score (`clip_score`); `evaluation` runs them over
a folder of videos (`python -m st2v_jax.evaluate`)."""
