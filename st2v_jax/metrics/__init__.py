"""The paper's evaluation metrics (Table 1): MAWE (`mawe`, with the RAFT-large flow of
`raft`), SCuts (`scene_cuts`) and the CLIP score (`clip_score`); `evaluation` runs them over
a folder of videos (`python -m st2v_jax.evaluate`). For the synthetic shapes domain,
`shapes_detection` reads each frame's shapes analytically and `shapes_eval` scores a model's
prompt adherence, consistency, motion and ablations from that (`python -m st2v_jax.evaluate_shapes`)."""
