"""Eq. 5-10 against values computed by hand."""

import numpy as np
import pytest

from cleannet_tf import losses

# Four queries: verified correct, verified mislabeled (above and below the
# margin), and unverified.
SCORE = np.array([0.8, 0.5, 0.05, 0.3], np.float32)
VERIFICATION = np.array([1, 0, 0, -1])


def test_supervised_cosine_loss():
  got = np.asarray(losses.supervised_cosine_loss(SCORE, VERIFICATION, margin=0.1,
                                                 negative_weight=5.0))
  # l=1: 1 - 0.8 = 0.2; l=0: 5 * max(0, 0.5 - 0.1) = 2.0; 5 * max(0, 0.05 - 0.1) = 0;
  # l=-1: 0.
  np.testing.assert_allclose(got, [0.2, 2.0, 0.0, 0.0], atol=1e-6)


def test_reconstruction_loss_sums_squares():
  target = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  reconstruction = np.array([[0.0, 0.0, 0.5], [1.0, 1.0, 1.0]], np.float32)
  # 1 + 4 + 0.25 = 5.25; 1 + 1 + 1 = 3.
  np.testing.assert_allclose(losses.reconstruction_loss(target, reconstruction), [5.25, 3.0])


def test_unsupervised_cosine_loss_uses_pseudo_labels():
  score = np.array([0.3, 0.1, 0.09, -0.5], np.float32)
  # cos >= rho: 1 - cos (0.7, 0.9); below: ignored.
  np.testing.assert_allclose(losses.unsupervised_cosine_loss(score, margin=0.1),
                             [0.7, 0.9, 0.0, 0.0], atol=1e-6)


def test_batch_quantile_counts_only_included_queries():
  score = np.array([0.9, -0.2, 0.5, 0.1, 0.3, 0.7], np.float32)
  included = np.array([1, 0, 1, 1, 1, 1], np.float32)
  # Included scores sorted: 0.1, 0.3, 0.5, 0.7, 0.9.
  assert float(losses.batch_quantile(score, included, 0.0)) == pytest.approx(0.1)
  assert float(losses.batch_quantile(score, included, 0.4)) == pytest.approx(0.5)
  assert float(losses.batch_quantile(score, np.zeros(6, np.float32), 0.4)) == np.inf


def test_pseudo_label_quantile_leaves_the_lowest_unverified_queries_unpulled():
  score = np.array([0.9, -0.2, 0.5, 0.1, 0.3, 0.7], np.float32)
  verification = np.array([-1, 1, -1, -1, -1, -1])
  outputs = {"score": score, "normalized_features": np.zeros([6, 2], np.float32),
             "reconstruction": np.zeros([6, 2], np.float32)}
  weights = losses.LossWeights(pseudo_label_quantile=0.4)
  got = np.asarray(losses.total_loss(outputs, verification, weights)["unsupervised"])
  # The two lowest of the five unverified (0.1, 0.3) get pseudo-label 0; the
  # verified query is not an unverified one at all.
  np.testing.assert_allclose(got, [0.1, 0.0, 0.5, 0.0, 0.0, 0.3], atol=1e-6)
  every = losses.total_loss(outputs, verification, losses.LossWeights())["unsupervised"]
  np.testing.assert_allclose(every, [0.1, 0.0, 0.5, 0.9, 0.7, 0.3], atol=1e-6)


def test_total_loss_combines_with_beta_gamma_and_t():
  target = np.zeros([4, 2], np.float32)
  reconstruction = np.array([[1, 0], [0, 2], [1, 1], [0, 1]], np.float32)  # L_r: 1, 4, 2, 1
  outputs = {"score": SCORE, "normalized_features": target, "reconstruction": reconstruction}
  weights = losses.LossWeights(margin=0.1, negative_weight=5.0, beta=0.1, gamma=0.5)
  got = losses.total_loss(outputs, VERIFICATION, weights)
  # L_cos + 0.1 L_r + t * 0.5 * L_unsup; only the last query has t = 1, with
  # cos 0.3 >= 0.1 so L_unsup = 0.7.
  expected = [0.2 + 0.1, 2.0 + 0.4, 0.0 + 0.2, 0.0 + 0.1 + 0.5 * 0.7]
  np.testing.assert_allclose(got["total"], expected, atol=1e-6)
  np.testing.assert_allclose(got["unsupervised"], [0, 0, 0, 0.7], atol=1e-6)


def test_gradient_of_unsupervised_loss_does_not_flow_through_pseudo_label():
  import tensorflow as tf
  score = tf.Variable([0.5, 0.05])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(losses.unsupervised_cosine_loss(score, margin=0.1))
  np.testing.assert_allclose(tape.gradient(loss, score), [-1.0, 0.0])


def test_pseudo_label_margin_overrides_rho_in_eq_8_only():
  outputs = {"score": np.array([0.05, 0.05], np.float32),
             "normalized_features": np.zeros([2, 1], np.float32),
             "reconstruction": np.zeros([2, 1], np.float32)}
  verification = np.array([0, -1])
  paper = losses.total_loss(outputs, verification,
                            losses.LossWeights(gamma=1.0, pseudo_label_margin=None))
  # cos 0.05 < rho: the unverified query is ignored (Eq. 8) ...
  np.testing.assert_allclose(paper["total"], [0.0, 0.0], atol=1e-7)
  every = losses.total_loss(outputs, verification,
                            losses.LossWeights(gamma=1.0, pseudo_label_margin=-1.0))
  # ... unless the pseudo-label threshold is lowered; Eq. 6 keeps rho.
  np.testing.assert_allclose(every["total"], [0.0, 0.95], atol=1e-6)


def test_class_separation_loss_penalises_positive_cosine_between_classes_only():
  same = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)
  assert float(losses.class_separation_loss(same)) == pytest.approx(1.0)
  apart = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  assert float(losses.class_separation_loss(apart)) == pytest.approx(0.0, abs=1e-7)
  # cos 0.6 between the first two (both orders), 0 or negative elsewhere:
  # 2 * 0.36 / (3 * 2) ordered pairs.
  mixed = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], np.float32)
  assert float(losses.class_separation_loss(mixed)) == pytest.approx(0.12, abs=1e-6)
  assert float(losses.class_separation_loss(same[:1])) == 0.0


def test_class_separation_gradient_pulls_coinciding_embeddings_apart():
  import tensorflow as tf
  embeddings = tf.Variable([[1.0, 0.1], [1.0, -0.1]])
  before = float(losses.class_separation_loss(embeddings))
  for _ in range(20):
    with tf.GradientTape() as tape:
      loss = losses.class_separation_loss(embeddings)
    embeddings.assign_sub(0.5 * tape.gradient(loss, embeddings))
  assert float(losses.class_separation_loss(embeddings)) < 0.5 * before
