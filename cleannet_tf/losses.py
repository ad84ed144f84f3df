"""CleanNet's objectives, per example (paper Eq. 5-10).

All functions return one loss per query [B]; the training step reduces them
with ``tf.nn.compute_average_loss`` over the global batch, so the result is the
same on one device and under a ``tf.distribute`` strategy.
"""

import dataclasses

from keras import ops

UNVERIFIED, MISLABELED, CORRECT = -1, 0, 1


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Hyperparameters of the total loss.

  rho and omega are the paper's and the release's; beta is rescaled for
  standardised features (below). gamma and the Eq. 8 threshold are not the
  paper's: with the paper's (gamma 0.1, threshold rho) CleanNet
  transferred worse than keeping every label to the classes without
  verification labels, on CIFAR-10N and on the demo. Treating every unverified
  query as relevant to its noisy class (threshold -1) at gamma 1 lets the
  noisy labels of all classes shape the query encoder. Chosen on CIFAR-10N's
  verified rows; the ablation in BENCHMARKS.md compares each change with the
  paper's value (``training.PAPER_SETTINGS``).
  """
  margin: float = 0.1          # rho, Eq. 6 and 8
  negative_weight: float = 5.0  # omega, Eq. 6
  # Reconstruction weight, Eq. 9 (paper: 0.1). Eq. 5 sums squared errors over
  # the D feature dimensions, so its size follows the features' scale: on
  # standardised features (unit variance per dimension) it is ~D times that of
  # the release's log1p features, and at 0.1 it outweighed the cosine losses.
  beta: float = 0.001
  gamma: float = 1.0           # unsupervised weight, Eq. 9 (paper: 0.1)
  # Threshold of the pseudo-verification label (Eq. 8); None uses rho, as the
  # paper. -1 treats every unverified query as relevant to its class.
  pseudo_label_margin: float | None = -1.0
  # Not in the paper: the lowest-scoring share of a batch's unverified queries
  # gets pseudo-label 0 whatever the threshold above (0: none). Mislabelled
  # queries score lowest, and pulling them toward their noisy class teaches
  # the query encoder that their images belong there. None: the share of
  # verified rows that are mislabelled, measured by the trainer. Off: on
  # CIFAR-10N a share of 0.2 helped the classes without verification labels
  # a little on worse_label and hurt them on aggre_label, and the noise-rate
  # share was level on both (docs/experiments/README.md).
  pseudo_label_quantile: float | None = 0.0


def supervised_cosine_loss(score, verification, margin=0.1, negative_weight=5.0):
  """Eq. 6: 1 - cos for l = 1; omega max(0, cos - rho) for l = 0; 0 for l = -1.

  Args:
    score: float [B], cos(phi^q, phi^s_c).
    verification: int [B] in {-1, 0, 1}.
  """
  verification = ops.cast(verification, "int32")
  positive = ops.cast(verification == CORRECT, score.dtype) * (1.0 - score)
  negative = (ops.cast(verification == MISLABELED, score.dtype)
              * negative_weight * ops.relu(score - margin))
  return positive + negative


def reconstruction_loss(target, reconstruction):
  """Eq. 5: ||v^q - r(v^q)||^2, summed over feature dimensions [B, D] -> [B]."""
  return ops.sum(ops.square(target - reconstruction), axis=-1)


def unsupervised_cosine_loss(score, margin=0.1):
  """Eq. 7-8: pseudo-verification; 1 - cos where cos >= rho, else 0. [B] -> [B].

  The pseudo label is a hard indicator, so no gradient flows through it.
  `margin` is a scalar or a [B] tensor.
  """
  pseudo_label = ops.cast(ops.stop_gradient(score) >= margin, score.dtype)
  return pseudo_label * (1.0 - score)


def batch_quantile(score, included, quantile):
  """The `quantile` of `score` [B] over the queries where `included` [B] is 1.

  The lower order statistic (no interpolation), so a query scoring below it
  is in the lowest `quantile` share; +inf where no query is included.
  """
  score = ops.stop_gradient(score)
  ordered = ops.sort(ops.where(included > 0, score, float("inf")))
  count = ops.sum(ops.cast(included > 0, "int32"))
  position = ops.cast(ops.floor(quantile * ops.cast(count, "float32")), "int32")
  return ops.take(ordered, ops.minimum(position, ops.shape(score)[0] - 1))


def total_loss(outputs, verification, weights=LossWeights()):
  """Eq. 9-10 per query: L_cos + beta L_r + t gamma L_cos^unsup, t = [l == -1].

  Args:
    outputs: the dict returned by ``CleanNet.__call__``.
    verification: int [B] in {-1, 0, 1}.

  Returns:
    dict of float [B] tensors: ``total``, ``supervised``, ``reconstruction``,
    ``unsupervised`` (the last three unweighted, for summaries).
  """
  score = outputs["score"]
  supervised = supervised_cosine_loss(
      score, verification, weights.margin, weights.negative_weight)
  reconstruction = reconstruction_loss(
      outputs["normalized_features"], outputs["reconstruction"])
  unverified = ops.cast(ops.cast(verification, "int32") == UNVERIFIED, score.dtype)
  pseudo_label_margin = (weights.margin if weights.pseudo_label_margin is None
                         else weights.pseudo_label_margin)
  if weights.pseudo_label_quantile:
    pseudo_label_margin = ops.maximum(
        pseudo_label_margin, batch_quantile(score, unverified, weights.pseudo_label_quantile))
  unsupervised = unverified * unsupervised_cosine_loss(score, pseudo_label_margin)
  return {
      "total": supervised + weights.beta * reconstruction + weights.gamma * unsupervised,
      "supervised": supervised,
      "reconstruction": reconstruction,
      "unsupervised": unsupervised,
  }


def class_separation_loss(class_embeddings):
  """Mean relu(cos)^2 over the pairs of distinct classes' embeddings [C, E] -> [].

  A regulariser, not in the paper. Classes are exclusive, so their embeddings
  should not coincide. Eq. 8 alone rewards coinciding: pulling the unverified
  queries of a class without verification labels toward their class
  embedding, mislabelled ones included, costs nothing if that class and the
  classes its noise comes from share one embedding, and nothing else pushes
  them apart. Negative cosines cost nothing, so the penalty does not ask for
  more than orthogonality.
  """
  normalized = class_embeddings / ops.maximum(
      ops.norm(class_embeddings, axis=-1, keepdims=True), 1e-12)
  cosine = ops.matmul(normalized, ops.transpose(normalized))
  size = ops.shape(cosine)[0]
  different = 1.0 - ops.eye(size, dtype=cosine.dtype)
  pairs = ops.maximum(ops.cast(size * (size - 1), cosine.dtype), 1.0)
  return ops.sum(different * ops.square(ops.relu(cosine))) / pairs
