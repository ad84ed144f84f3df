"""CleanNet as Keras 3 layers and a subclassed model (paper Sec. 3.1, Fig. 1-2).

Pieces, one concept per layer:

* ``FeatureNormalization``: log(x+1) / l2 / none on raw CNN features, then
  standardisation with the training features' statistics.
* ``ReferenceAttention``: attention pooling with a learned context vector
  (Eq. 2-4), masked for classes with fewer than K references.
* ``ReferenceSetEncoder`` (f_s): 2-layer MLP per reference, attention, 1-layer
  MLP to the class embedding.
* ``QueryAutoencoder`` (f_q): 5-layer autoencoder giving the query embedding and
  the reconstruction (Eq. 5).
* ``CleanNet``: holds the reference feature sets of all L classes and the
  detection threshold delta; scores (query, noisy class) pairs by cosine
  similarity between query and class embeddings.

Every class implements ``get_config`` and is registered, so ``.keras`` files
written by training load with ``keras.models.load_model`` once
``cleannet_tf`` is imported.
"""

import keras
from keras import ops
import tensorflow as tf

_PACKAGE = "cleannet_tf"
NORMALIZATIONS = ("log1p", "l2", "none")
# Default widths: the query autoencoder's hidden layer and the embeddings.
# The paper's (256 and 128, for 2048-d ResNet-50 features) are twice as
# narrow; on CIFAR-10N's step-1 features these validated better on both label
# sets' verified rows, over 3 seeds (BENCHMARKS.md, ablation paper_embeddings).
QUERY_HIDDEN_DIM = 512
EMBEDDING_DIM = 256


def cosine_similarity(a, b, epsilon=1e-12):
  """Row-wise cosine similarity of ``a`` [..., E] and ``b`` [..., E] -> [...]."""
  a = a / ops.sqrt(ops.maximum(ops.sum(ops.square(a), axis=-1, keepdims=True), epsilon))
  b = b / ops.sqrt(ops.maximum(ops.sum(ops.square(b), axis=-1, keepdims=True), epsilon))
  return ops.sum(a * b, axis=-1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeatureNormalization(keras.layers.Layer):
  """Normalises raw CNN features before both encoders.

  First a fixed transform, ``mode``:
    * ``"log1p"`` (default, as the authors' release): ``sign(x) log(|x| + 1)``,
      which is log(x+1) for the non-negative pooled features of a ReLU CNN and
      stays finite for signed features instead of giving NaN below -1.
    * ``"l2"``: unit l2 norm per vector.
    * ``"none"``: identity.

  Then, with ``standardize`` (the default), per-dimension standardisation
  ``(t - mean) / std`` with statistics of the training features
  (``set_statistics``), held as non-trainable weights so they travel with the
  model. Why: pooled ReLU features share a large positive component (on
  CIFAR-10N the 10 class means have cosine 0.88-0.99), so every reference set
  starts with nearly the same class embedding and the shared reference
  encoder learns to tell classes apart slowly, if at all. Centred features
  remove that component. The ablation ``log1p_only`` in BENCHMARKS.md
  measures it.
  """

  def __init__(self, mode="log1p", standardize=True, **kwargs):
    super().__init__(**kwargs)
    if mode not in NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    self.mode = mode
    self.standardize = bool(standardize)

  def build(self, input_shape):
    if self.standardize:
      dim = input_shape[-1]
      self.mean = self.add_weight(name="mean", shape=(dim,), initializer="zeros",
                                  trainable=False)
      self.std = self.add_weight(name="std", shape=(dim,), initializer="ones",
                                 trainable=False)

  def transform(self, features):
    """The fixed transform alone: float [..., D] -> float [..., D]."""
    if self.mode == "log1p":
      return ops.sign(features) * ops.log1p(ops.abs(features))
    if self.mode == "l2":
      norm = ops.sqrt(ops.maximum(ops.sum(ops.square(features), axis=-1, keepdims=True), 1e-12))
      return features / norm
    return features

  def set_statistics(self, mean, std):
    """Sets the standardisation's mean [D] and std [D] (of transformed features)."""
    if not self.standardize:
      raise ValueError("this FeatureNormalization does not standardize")
    self.mean.assign(ops.cast(mean, self.mean.dtype))
    # A constant dimension would divide by zero; leave it unscaled.
    self.std.assign(ops.where(ops.cast(std, self.std.dtype) > 1e-6,
                              ops.cast(std, self.std.dtype), 1.0))

  def call(self, features):
    """features: float [..., D] -> float [..., D]."""
    transformed = self.transform(features)
    if self.standardize:
      transformed = (transformed - self.mean) / self.std
    return transformed

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "mode": self.mode, "standardize": self.standardize}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReferenceAttention(keras.layers.Layer):
  """Attention pooling over a reference set with a learned context vector.

  u_i = tanh(W h_i + b) (Eq. 2); alpha_i = softmax_i(u_i . u) (Eq. 3);
  h = sum_i alpha_i h_i (Eq. 4). Padding references (mask False) get zero
  weight; a set with no real reference pools to the zero vector.
  """

  def __init__(self, attention_dim=256, **kwargs):
    super().__init__(**kwargs)
    self.attention_dim = attention_dim

  def build(self, input_shape):
    hidden_dim = input_shape[-1]
    self.projection = self.add_weight(
        name="projection", shape=(hidden_dim, self.attention_dim),
        initializer="glorot_uniform")
    self.projection_bias = self.add_weight(
        name="projection_bias", shape=(self.attention_dim,), initializer="zeros")
    self.context = self.add_weight(
        name="context", shape=(self.attention_dim,),
        initializer=keras.initializers.RandomNormal(stddev=0.1))

  def call(self, hidden, mask):
    """Pools a batch of reference sets.

    Args:
      hidden: float [B, K, H], per-reference hidden representations h_i.
      mask: bool [B, K], True for real references.

    Returns:
      (pooled [B, H], attention [B, K]); attention rows sum to 1 over real
      references (all zeros for an empty set).
    """
    u = ops.tanh(ops.matmul(hidden, self.projection) + self.projection_bias)
    logits = ops.sum(u * self.context, axis=-1)  # [B, K]
    # Masked softmax by hand: subtracting the max of real logits keeps exp()
    # finite, and multiplying by the mask gives padding exactly zero weight.
    mask = ops.cast(mask, logits.dtype)
    logits = logits - ops.max(logits * mask - (1.0 - mask) * 1e9, axis=-1, keepdims=True)
    weights = ops.exp(ops.minimum(logits, 0.0)) * mask
    total = ops.sum(weights, axis=-1, keepdims=True)
    attention = weights / ops.maximum(total, 1e-12)
    pooled = ops.sum(hidden * attention[..., None], axis=1)
    return pooled, attention

  def get_config(self):
    return {**super().get_config(), "attention_dim": self.attention_dim}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReferenceSetEncoder(keras.layers.Layer):
  """f_s: maps a reference feature set V_c^s to the class embedding phi_c^s."""

  def __init__(self, hidden_dims=(512, 256), attention_dim=256, embedding_dim=EMBEDDING_DIM,
               dropout=0.0, activation="tanh", **kwargs):
    super().__init__(**kwargs)
    self.hidden_dims = tuple(hidden_dims)
    self.attention_dim = attention_dim
    self.embedding_dim = embedding_dim
    self.dropout = dropout
    self.activation = activation
    self.first = keras.layers.Dense(self.hidden_dims[0], activation=activation, name="mlp_0")
    self.dropout_layer = keras.layers.Dropout(dropout)
    self.second = keras.layers.Dense(self.hidden_dims[1], activation=activation, name="mlp_1")
    self.attention = ReferenceAttention(attention_dim, name="attention")
    self.to_embedding = keras.layers.Dense(embedding_dim, activation=activation, name="embedding")

  def build(self, input_shape):
    batch, k, dim = input_shape
    self.first.build((batch, k, dim))
    self.second.build((batch, k, self.hidden_dims[0]))
    self.attention.build((batch, k, self.hidden_dims[1]))
    self.to_embedding.build((batch, self.hidden_dims[1]))

  def call(self, references, mask, training=False):
    """Encodes reference sets.

    Args:
      references: float [B, K, D], normalised reference features.
      mask: bool [B, K], True for real references.

    Returns:
      (class_embedding [B, E], attention [B, K]).
    """
    hidden = self.second(self.dropout_layer(self.first(references), training=training))
    pooled, attention = self.attention(hidden, mask)
    return self.to_embedding(pooled), attention

  def get_config(self):
    return {**super().get_config(), "hidden_dims": list(self.hidden_dims),
            "attention_dim": self.attention_dim, "embedding_dim": self.embedding_dim,
            "dropout": self.dropout, "activation": self.activation}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QueryAutoencoder(keras.layers.Layer):
  """f_q: the 5-layer autoencoder D -> hidden -> E (embedding) -> hidden -> D.

  Hidden layers use ``activation`` (tanh, as the authors' release). The
  reconstruction layer is linear by default: log(x+1) features exceed 1, which
  a tanh output could never reconstruct.
  """

  def __init__(self, feature_dim, hidden_dim=QUERY_HIDDEN_DIM, embedding_dim=EMBEDDING_DIM,
               activation="tanh",
               reconstruction_activation="linear", **kwargs):
    super().__init__(**kwargs)
    self.feature_dim = feature_dim
    self.hidden_dim = hidden_dim
    self.embedding_dim = embedding_dim
    self.activation = activation
    self.reconstruction_activation = reconstruction_activation
    self.encoder_hidden = keras.layers.Dense(hidden_dim, activation=activation, name="encoder_hidden")
    self.encoder_embedding = keras.layers.Dense(embedding_dim, activation=activation, name="embedding")
    self.decoder_hidden = keras.layers.Dense(hidden_dim, activation=activation, name="decoder_hidden")
    self.decoder_output = keras.layers.Dense(
        feature_dim, activation=reconstruction_activation, name="reconstruction")

  def build(self, input_shape):
    batch = input_shape[0]
    self.encoder_hidden.build((batch, self.feature_dim))
    self.encoder_embedding.build((batch, self.hidden_dim))
    self.decoder_hidden.build((batch, self.embedding_dim))
    self.decoder_output.build((batch, self.hidden_dim))

  def call(self, features):
    """features: float [B, D] -> (embedding [B, E], reconstruction [B, D])."""
    embedding = self.encoder_embedding(self.encoder_hidden(features))
    return embedding, self.decoder_output(self.decoder_hidden(embedding))

  def encode(self, features):
    """features: float [B, D] -> embedding [B, E], skipping the decoder."""
    return self.encoder_embedding(self.encoder_hidden(features))

  def get_config(self):
    return {**super().get_config(), "feature_dim": self.feature_dim,
            "hidden_dim": self.hidden_dim, "embedding_dim": self.embedding_dim,
            "activation": self.activation,
            "reconstruction_activation": self.reconstruction_activation}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CleanNet(keras.Model):
  """The joint embedding network, holding the reference sets of all classes.

  ``model({"features": [B, D], "class_id": [B]})`` returns a dict:
    * ``score`` [B]: cos(phi^q, phi^s_c), the relevance of each query to its
      noisy class c;
    * ``query_embedding`` [B, E], ``class_embedding`` [B, E];
    * ``normalized_features`` [B, D] (the autoencoder's target) and
      ``reconstruction`` [B, D].

  The reference features [L, K, D], their counts [L], the detection
  threshold ``delta`` and what moves it per class for classes without
  verification labels (``score_quartiles`` [L, 3], ``verified_classes`` [L];
  ``scoring.class_thresholds``) are non-trainable weights, so they travel
  inside the ``.keras`` file and the exported SavedModel.
  """

  def __init__(self, num_classes, num_references, feature_dim, normalization="log1p",
               standardize_features=True, query_hidden_dim=QUERY_HIDDEN_DIM,
               embedding_dim=EMBEDDING_DIM, reference_hidden_dims=(512, 256),
               attention_dim=256, dropout=0.0, activation="tanh",
               reconstruction_activation="linear", **kwargs):
    super().__init__(**kwargs)
    self.num_classes = int(num_classes)
    self.num_references = int(num_references)
    self.feature_dim = int(feature_dim)
    self.normalization = normalization
    self.standardize_features = bool(standardize_features)
    self.query_hidden_dim = query_hidden_dim
    self.embedding_dim = embedding_dim
    self.reference_hidden_dims = tuple(reference_hidden_dims)
    self.attention_dim = attention_dim
    self.dropout = dropout
    self.activation = activation
    self.reconstruction_activation = reconstruction_activation
    self.normalize = FeatureNormalization(normalization, standardize_features, name="normalize")
    self.query_encoder = QueryAutoencoder(
        feature_dim, query_hidden_dim, embedding_dim, activation,
        reconstruction_activation, name="query_encoder")
    self.reference_encoder = ReferenceSetEncoder(
        reference_hidden_dims, attention_dim, embedding_dim, dropout, activation,
        name="reference_encoder")
    # Every shape is known from the config, so build now: a model is usable
    # (and loadable) without a first call.
    self.build()

  def build(self, input_shape=None):
    if self.built:
      return
    self.reference_features = self.add_weight(
        name="reference_features",
        shape=(self.num_classes, self.num_references, self.feature_dim),
        initializer="zeros", trainable=False)
    self.reference_counts = self.add_weight(
        name="reference_counts", shape=(self.num_classes,), dtype="int32",
        initializer="zeros", trainable=False)
    self.delta = self.add_weight(
        name="delta", shape=(), initializer=keras.initializers.Constant(0.1),
        trainable=False)
    # What ``detection.class_thresholds`` moves delta by for classes without
    # verification labels (set by ``scoring.set_class_score_quartiles``); the
    # defaults (every class verified) keep one delta for all.
    self.score_quartiles = self.add_weight(
        name="score_quartiles", shape=(self.num_classes, 3), initializer="zeros",
        trainable=False)
    self.verified_classes = self.add_weight(
        name="verified_classes", shape=(self.num_classes,), dtype="int32", initializer="ones",
        trainable=False)
    self.normalize.build((None, self.feature_dim))
    self.query_encoder.build((None, self.feature_dim))
    self.reference_encoder.build((None, self.num_references, self.feature_dim))
    self.built = True

  def load_own_variables(self, store):
    # A file saved before score_quartiles and verified_classes existed holds
    # only the weights created before them; those two keep their defaults.
    own = self._trainable_variables + self._non_trainable_variables
    saved = len(store.keys())
    if saved >= len(own):
      super().load_own_variables(store)
      return
    for index, variable in enumerate(own[:saved]):
      variable.assign(store[str(index)])

  def set_reference_sets(self, reference_sets):
    """Loads a ``references.ReferenceSets`` (features [L, K, D], counts [L])."""
    expected = (self.num_classes, self.num_references, self.feature_dim)
    if tuple(reference_sets.features.shape) != expected:
      raise ValueError(
          f"reference sets have shape {tuple(reference_sets.features.shape)}, "
          f"the model expects {expected}")
    self.reference_features.assign(reference_sets.features)
    self.reference_counts.assign(ops.cast(reference_sets.counts, "int32"))

  def _encode_references(self, class_id, training):
    """class_id int [B] -> (class embedding [B, E], attention [B, K])."""
    references = self.normalize(ops.take(self.reference_features, class_id, axis=0))
    counts = ops.take(self.reference_counts, class_id, axis=0)
    mask = ops.arange(self.num_references, dtype="int32")[None, :] < counts[:, None]
    return self.reference_encoder(references, mask, training=training)

  def call(self, inputs, training=False, class_embeddings=None):
    """Scores each query against its noisy class (the dict above).

    Args:
      inputs: {"features": float [B, D], "class_id": int [B]}.
      class_embeddings: optional float [L, E], every class's embedding already
        encoded in this step (training computes them for the class separation
        penalty); the batch's are taken from it instead of encoded again.
    """
    features = self.normalize(inputs["features"])
    class_id = ops.cast(inputs["class_id"], "int32")
    query_embedding, reconstruction = self.query_encoder(features)
    if class_embeddings is not None:
      class_embedding = ops.take(class_embeddings, class_id, axis=0)
    else:
      # A batch holds far fewer classes than queries (at most L): encode each
      # class's K references once and share the embedding among its queries.
      # With K=50 references the reference MLP is most of a step's compute.
      classes, position = tf.unique(class_id)
      class_embedding = ops.take(self._encode_references(classes, training)[0], position,
                                 axis=0)
    return {
        "score": cosine_similarity(query_embedding, class_embedding),
        "query_embedding": query_embedding,
        "class_embedding": class_embedding,
        "normalized_features": features,
        "reconstruction": reconstruction,
    }

  def class_embeddings(self, class_ids=None, training=False):
    """Class embeddings ([C, E], attention [C, K]) of `class_ids` [C], default all L."""
    if class_ids is None:
      class_ids = ops.arange(self.num_classes, dtype="int32")
    return self._encode_references(ops.cast(class_ids, "int32"), training)

  def query_embeddings(self, features):
    """Raw features [N, D] -> query embeddings [N, E] (inference)."""
    return self.query_encoder.encode(self.normalize(features))

  def score_with_class_embeddings(self, features, class_id, class_embeddings):
    """Scores queries against precomputed class embeddings [L, E] -> [N]."""
    return cosine_similarity(
        self.query_embeddings(features),
        ops.take(class_embeddings, ops.cast(class_id, "int32"), axis=0))

  def get_config(self):
    return {**super().get_config(), "num_classes": self.num_classes,
            "num_references": self.num_references, "feature_dim": self.feature_dim,
            "normalization": self.normalization,
            "standardize_features": self.standardize_features,
            "query_hidden_dim": self.query_hidden_dim,
            "embedding_dim": self.embedding_dim,
            "reference_hidden_dims": list(self.reference_hidden_dims),
            "attention_dim": self.attention_dim, "dropout": self.dropout,
            "activation": self.activation,
            "reconstruction_activation": self.reconstruction_activation}
