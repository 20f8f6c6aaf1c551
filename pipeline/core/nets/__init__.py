"""Networks: timm backbones with our pooling and weights handling, the decoupled heads, the losses.

- `models`: create_model, local pretrained weights (read_state_dict, load_pretrained), features and logits.
- `heads`: the stage-3 variants on frozen features (VARIANTS: joint, crt, tau, lws, ncm, knn, logit_adjust) and
  their nested tuning (cross_fit).
- `losses`: soft-target cross-entropy, focal, LDAM and ArcFace's angular margin with class weights.
- `families`: the head families by the backbone their logits come from (fine-tuned, probe, WiSE-FT) and how
  each backbone is made: what stage 4, export and the teachers share.

Nothing is imported here: `from pipeline.core.nets import models` loads that module alone.
"""
