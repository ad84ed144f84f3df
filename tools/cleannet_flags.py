"""The CleanNet model and training flags, shared by the train and demo binaries.

Defaults are the library's (``TrainConfig``, ``CleanNet``), which follow
DEFAULTS.md; importing this module defines the flags.
"""

from absl import flags

from cleannet_tf import detection, distribute, losses, model, training

_TRAIN = training.TrainConfig()
_LOSS = losses.LossWeights()

# Model.
flags.DEFINE_enum("normalization", "log1p", list(model.NORMALIZATIONS),
                  "Feature normalisation before both encoders.")
flags.DEFINE_bool("standardize_features", True,
                  "Standardise normalised features with the training features' mean and std.")
flags.DEFINE_integer("num_references", 50, "K: references per class (K-means centroids).")
flags.DEFINE_integer("query_hidden_dim", model.QUERY_HIDDEN_DIM,
                     "Hidden width of the query autoencoder (the paper: 256).")
flags.DEFINE_integer("embedding_dim", model.EMBEDDING_DIM,
                     "Width of query and class embeddings (the paper: 128).")
flags.DEFINE_list("reference_hidden_dims", ["512", "256"],
                  "Widths of the 2-layer MLP applied to each reference.")
flags.DEFINE_integer("attention_dim", 256, "Width of u_i in the attention (Eq. 2).")
flags.DEFINE_float("dropout", 0.0, "Dropout between the reference MLP's layers.")
# Training.
flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES),
                  "auto: MultiWorkerMirrored with TF_CONFIG, Mirrored on GPUs, else default.")
flags.DEFINE_integer("steps", _TRAIN.steps, "Total training steps (a rerun resumes).")
flags.DEFINE_integer("batch_size", _TRAIN.global_batch_size, "Global batch size.")
flags.DEFINE_float("unverified_fraction", _TRAIN.unverified_fraction,
                   "Share of each batch given to unverified queries (drawn class-uniformly).")
flags.DEFINE_enum("optimizer", _TRAIN.optimizer, ["sgd", "adam"],
                  "sgd: SGD with --momentum (the release); adam: Adam.")
flags.DEFINE_float("learning_rate", _TRAIN.learning_rate, "Initial learning rate.")
flags.DEFINE_float("momentum", _TRAIN.momentum, "SGD momentum.")
flags.DEFINE_integer("lr_decay_steps", _TRAIN.lr_decay_steps,
                     "Multiply the learning rate by --lr_decay_rate every this many steps.")
flags.DEFINE_float("lr_decay_rate", _TRAIN.lr_decay_rate, "Step decay factor.")
flags.DEFINE_float("weight_decay", _TRAIN.weight_decay, "L2 weight decay (wd * sum(w^2) / 2).")
flags.DEFINE_float("margin", _LOSS.margin, "rho: cosine margin (Eq. 6, 8).")
flags.DEFINE_float("negative_weight", _LOSS.negative_weight, "omega: weight of l=0 queries.")
flags.DEFINE_float("beta", _LOSS.beta, "Weight of the reconstruction loss (Eq. 9).")
flags.DEFINE_float("gamma", _LOSS.gamma, "Weight of the unsupervised loss (Eq. 9).")
flags.DEFINE_float("pseudo_label_margin", _LOSS.pseudo_label_margin,
                   "Pseudo-verification threshold of Eq. 8; unset: --margin, as the paper.")
flags.DEFINE_float("pseudo_label_quantile", _LOSS.pseudo_label_quantile,
                   "Share of a batch's unverified queries, the lowest-scoring, given "
                   "pseudo-label 0 (not pulled toward their class); 0: none.")
flags.DEFINE_float("cross_class_negatives", _TRAIN.cross_class_negatives,
                   "Share of verified-correct queries re-paired with another class's "
                   "reference set as verified negatives.")
flags.DEFINE_float("unverified_cross_class_negatives", _TRAIN.unverified_cross_class_negatives,
                   "Share of unverified queries re-paired with another class's "
                   "reference set as negatives.")
flags.DEFINE_integer("negative_neighbors", _TRAIN.negative_neighbors,
                     "Draw the class of a cross-class negative among the n classes whose "
                     "reference sets are nearest the query's class (0: among all).")
flags.DEFINE_float("class_separation", _TRAIN.class_separation,
                   "Weight of the penalty on positive cosine between different classes' "
                   "embeddings (not in the paper; 0 turns it off).")
flags.DEFINE_integer("separation_classes", _TRAIN.separation_classes,
                     "Classes sampled per step for --class_separation.")
flags.DEFINE_float("weight_averaging", _TRAIN.weight_averaging,
                   "Decay of the moving average of the weights that is validated and "
                   "saved (0: the last step's weights).")
flags.DEFINE_enum("threshold_rule", _TRAIN.threshold_rule, detection.THRESHOLD_RULES,
                  "How delta is chosen on the verified validation rows: where a logistic "
                  "fit of the verification labels on the score crosses 1/2 (calibrated), "
                  "or at the lowest validation error (minimum, the paper's).")
flags.DEFINE_float("threshold_tie_band", _TRAIN.threshold_tie_band,
                   "With --threshold_rule=minimum, when some classes have no verified "
                   "validation rows, delta is the middle of the thresholds within this "
                   "many standard deviations of the lowest validation error (0: the exact "
                   "minimum, the paper's).")
flags.DEFINE_bool("transfer_thresholds", _TRAIN.transfer_thresholds,
                  "Give each class without verification labels delta moved to the same "
                  "place in its own score distribution, by its score quartiles (default: "
                  "one delta for all, the paper's).")
flags.DEFINE_integer("reference_refinement", _TRAIN.reference_refinement,
                     "Rounds, after training, of rebuilding each class's reference set "
                     "from the rows the model scores >= delta against it (0: none, the "
                     "paper's).")
flags.DEFINE_float("val_fraction", _TRAIN.val_fraction,
                   "Share of verified rows held out for validation (without --val_features).")
flags.DEFINE_integer("eval_every", _TRAIN.eval_every, "Validate every this many steps.")
flags.DEFINE_integer("checkpoint_every", _TRAIN.checkpoint_every, "Checkpoint period.")
flags.DEFINE_integer("log_every", _TRAIN.log_every, "Progress/TensorBoard period.")
flags.DEFINE_integer("shuffle_buffer", _TRAIN.shuffle_buffer,
                     "Shuffle buffer (rows) of the unverified stream.")
flags.DEFINE_integer("seed", _TRAIN.seed, "Seed for initialisation, shuffling and, unless "
                     "--split_seed is given, the validation split.")
flags.DEFINE_integer("split_seed", _TRAIN.split_seed,
                     "Seed of the validation split of verified rows; default --seed. Fix it "
                     "and vary --seed to repeat a run on the same validation rows.")

FLAGS = flags.FLAGS

for _name in ("num_references", "query_hidden_dim", "embedding_dim", "attention_dim", "steps",
              "batch_size", "lr_decay_steps", "eval_every", "checkpoint_every", "log_every",
              "shuffle_buffer", "separation_classes"):
  flags.register_validator(_name, lambda value: value > 0, f"--{_name} must be positive")
flags.register_validator("unverified_fraction", lambda v: 0.0 <= v < 1.0,
                         "--unverified_fraction must be in [0, 1)")
flags.register_validator("val_fraction", lambda v: 0.0 < v < 1.0,
                         "--val_fraction must be in (0, 1)")
for _name in ("cross_class_negatives", "unverified_cross_class_negatives"):
  flags.register_validator(_name, lambda v: 0.0 <= v <= 1.0, f"--{_name} must be in [0, 1]")
flags.register_validator("pseudo_label_quantile", lambda v: 0.0 <= v < 1.0,
                         "--pseudo_label_quantile must be in [0, 1)")
flags.register_validator("negative_neighbors", lambda v: v >= 0,
                         "--negative_neighbors must be non-negative")
flags.register_validator("class_separation", lambda v: v >= 0.0,
                         "--class_separation must be non-negative")
flags.register_validator("threshold_tie_band", lambda v: v >= 0.0,
                         "--threshold_tie_band must be >= 0")
flags.register_validator("weight_averaging", lambda v: 0.0 <= v < 1.0,
                         "--weight_averaging must be in [0, 1)")
flags.register_validator("reference_refinement", lambda v: v >= 0,
                         "--reference_refinement must be non-negative")
flags.register_validator("dropout", lambda v: 0.0 <= v < 1.0, "--dropout must be in [0, 1)")


def model_config(num_classes, feature_dim):
  """Keyword arguments of ``CleanNet`` from the flags."""
  return dict(num_classes=num_classes, num_references=FLAGS.num_references,
              feature_dim=feature_dim, normalization=FLAGS.normalization,
              standardize_features=FLAGS.standardize_features,
              query_hidden_dim=FLAGS.query_hidden_dim, embedding_dim=FLAGS.embedding_dim,
              reference_hidden_dims=[int(d) for d in FLAGS.reference_hidden_dims],
              attention_dim=FLAGS.attention_dim, dropout=FLAGS.dropout)


def train_config():
  """``TrainConfig`` from the flags."""
  return training.TrainConfig(
      steps=FLAGS.steps, global_batch_size=FLAGS.batch_size,
      unverified_fraction=FLAGS.unverified_fraction, optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate,
      momentum=FLAGS.momentum, lr_decay_steps=FLAGS.lr_decay_steps,
      lr_decay_rate=FLAGS.lr_decay_rate, weight_decay=FLAGS.weight_decay,
      loss=losses.LossWeights(FLAGS.margin, FLAGS.negative_weight, FLAGS.beta, FLAGS.gamma,
                              FLAGS.pseudo_label_margin, FLAGS.pseudo_label_quantile),
      cross_class_negatives=FLAGS.cross_class_negatives,
      unverified_cross_class_negatives=FLAGS.unverified_cross_class_negatives,
      negative_neighbors=FLAGS.negative_neighbors,
      class_separation=FLAGS.class_separation,
      separation_classes=FLAGS.separation_classes,
      weight_averaging=FLAGS.weight_averaging, threshold_rule=FLAGS.threshold_rule,
      threshold_tie_band=FLAGS.threshold_tie_band,
      transfer_thresholds=FLAGS.transfer_thresholds,
      reference_refinement=FLAGS.reference_refinement,
      val_fraction=FLAGS.val_fraction, eval_every=FLAGS.eval_every,
      checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
      shuffle_buffer=FLAGS.shuffle_buffer, seed=FLAGS.seed, split_seed=FLAGS.split_seed)
