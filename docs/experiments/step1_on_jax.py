"""Issue 8's prepared GPU check: steps 1 and 3 on CIFAR-10N, trained long, on JAX.

Not part of the package. Two CPU cores train step 1 for 8 epochs (BENCHMARKS.md),
and the question left is how CleanNet compares when the step-1 network is
trained well. The device machine lent to some sessions (one H200) has JAX and
PyTorch but no TensorFlow, and TensorFlow's wheel is far over what can travel
there, so this script trains the project's own small ResNet
(``cleannet_tf.backbones``, a Keras 3 model) with Keras on JAX, with the recipe of
``cleannet_tf.classifier.ClassifierTrainer`` (SGD momentum 0.9, decoupled weight
decay 5e-4 on kernels, lr 0.1 cosine to 0, batch 128, pad-4 crop + flip;
rows drawn with probability w / max(w), or w in the loss), for several jobs at
once (vmapped over a job axis): noisy-label column x CleanNet weights x epochs.
Keras weights files are backend-agnostic: ``model.load_weights`` on the
TensorFlow side gives the same logits (checked on CPU). Then, here, on the CPU:
``--to_step1=JOB --data=<results> --out=<dir>/step1`` makes a job's weights a
step1/ folder (classifier.keras, feature_extractor.keras, summary.json); then run
``tools.cifar10n_features --step1_from=<it>`` and ``tools.benchmark_detection``.

Inputs (one call can carry 64 MiB; the JPEGs tar to 20 MB):
  cd ../shared/data/cifar10n && tar czf $REPO/.gpu/cifar10n.tgz train test *.csv classes.txt
  python docs/experiments/step1_on_jax.py --pack_weights \
      --runs runs/benchmarks/features-worse_label,runs/benchmarks/features-aggre_label \
      --out .gpu/weights.npz   # <run>/classification-scratch/weights.npz of each
Wheels: keras, namex and optree for cp312 in .whl (device README). Device command:
  KERAS_BACKEND=jax python3 docs/experiments/step1_on_jax.py --data .gpu/cifar10n.tgz \
      --weights .gpu/weights.npz --out /tmp/res --budget_s 390 \
      --jobs worse:none:100,worse:none:30,aggre:none:100,clean:none:100,\
worse:worse_w_soft:100,worse:worse_w_hard:100,worse:worse_w_soft_loss:100,aggre:aggre_w_hard:100
A CPU smoke test: add --limit 256 --policy float32 (XLA's CPU convolutions are slow
under vmap: seconds per step).
"""
import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np

BATCH = 128
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
PAD = 4
NO_DECAY = ("bias", "gamma", "beta")


def _decode(blobs):
  from PIL import Image
  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def load_cifar10n(tgz, limit=None):
  """(train uint8 [N,32,32,3], columns {name: int [N]}, paths, test x, test y)."""
  members = {}
  with tarfile.open(tgz) as tar:
    for member in tar:
      if member.isfile():
        members[member.name] = tar.extractfile(member).read()
  classes = members["classes.txt"].decode().split()
  index = {name: i for i, name in enumerate(classes)}
  def rows(name):
    lines = members[name].decode().strip().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]
  train_rows, test_rows = rows("train.csv"), rows("test.csv")
  if limit:
    train_rows = train_rows[:limit]
    test_rows = test_rows[::max(1, len(test_rows) // limit)][:limit]
  def decode(paths):
    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    with ProcessPoolExecutor(min(16, os.cpu_count())) as pool:
      return np.concatenate(list(pool.map(_decode, [[members[p] for p in c] for c in chunks])))
  x_train = decode([r["path"] for r in train_rows])
  x_test = decode([r["path"] for r in test_rows])
  columns = {c: np.array([index[r[c]] for r in train_rows], np.int32)
             for c in ("clean_label", "aggre_label", "worse_label")}
  y_test = np.array([index[r["label"]] for r in test_rows], np.int32)
  return x_train, columns, [r["path"] for r in train_rows], x_test, y_test


def row_stream(rng, n, num_steps, weights):
  """Row ids [num_steps, BATCH]: shuffled passes, each row kept w.p. w / max(w)."""
  needed, parts = num_steps * BATCH, []
  while needed > 0:
    order = rng.permutation(n)
    if weights is not None:
      order = order[rng.random(n) < weights[order] / weights.max()]
    parts.append(order[:needed])
    needed -= len(parts[-1])
  return np.concatenate(parts).astype(np.int32).reshape(num_steps, BATCH)


def pack_weights(runs, out):
  """Each run's CleanNet weights (classification-scratch/weights.npz) by image path."""
  packed = {}
  for run in runs:
    label = os.path.basename(run.rstrip("/")).split("-")[1].removesuffix("_label")
    with open(os.path.join(run, "train.csv"), encoding="utf-8") as f:
      paths = [line.split(",")[0] for line in f.read().strip().splitlines()[1:]]
    paths = np.array([p[p.index("/train/") + 1:] for p in paths])
    if "paths" in packed and not np.array_equal(packed["paths"], paths):
      raise ValueError(f"{run}: rows in another order")
    packed["paths"] = paths
    with np.load(os.path.join(run, "classification-scratch", "weights.npz")) as saved:
      for name in ("w_soft", "w_hard"):
        packed[f"{label}_{name}"] = saved[name].astype(np.float32)
  np.savez(out, **packed)
  print({k: v.shape for k, v in packed.items()})


def to_step1(results, job, out):
  """Job `job` of a results folder as a finished step1/ folder (TensorFlow side)."""
  import keras
  from cleannet_tf import backbones, classifier
  with open(os.path.join(results, "summary.json"), encoding="utf-8") as f:
    summary = next(j for j in json.load(f)["jobs"] if j["name"] == job)
  model = backbones.build_classifier(backbones.small_resnet((32, 32, 3)), 10)
  model.load_weights(os.path.join(results, job + ".weights.h5"))
  os.makedirs(out, exist_ok=True)
  model.save(os.path.join(out, classifier.CLASSIFIER_FILE))
  backbones.feature_extractor(model).save(os.path.join(out, classifier.FEATURE_EXTRACTOR_FILE))
  summary = {**summary, "config": {"image_size": [32, 32]}, "trained_by": __file__,
             "backend": keras.backend.backend()}
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--to_step1", default=None,
                      help="JOB: only write job JOB of the results folder --data as a "
                      "step1/ folder --out (run with KERAS_BACKEND=tensorflow)")
  parser.add_argument("--pack_weights", action="store_true",
                      help="only write --out, an .npz of the weights of --runs")
  parser.add_argument("--runs", default="")
  parser.add_argument("--data")
  parser.add_argument("--weights", default=None)
  parser.add_argument("--out", required=True)
  parser.add_argument("--jobs", default="",
                      help="LABEL:WEIGHTS:EPOCHS,...; LABEL worse|aggre|clean, WEIGHTS none|"
                      "worse_w_soft|worse_w_hard|... with suffix _loss for loss weighting")
  parser.add_argument("--budget_s", type=float, default=300)
  parser.add_argument("--eval_every_epochs", type=float, default=10)
  parser.add_argument("--limit", type=int, default=None, help="rows (a smoke test)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--policy", default="mixed_bfloat16", help="float32 for a CPU smoke test")
  args = parser.parse_args()
  # The repository root, for cleannet_tf.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  if args.pack_weights:
    return pack_weights(args.runs.split(","), args.out)
  if args.to_step1:
    return to_step1(args.data, args.to_step1, args.out)
  started = time.time()

  # Decoded in worker processes before JAX starts its threads.
  x_train, columns, paths, x_test, y_test = load_cifar10n(args.data, args.limit)
  n = len(x_train)
  print(f"decoded {n} + {len(x_test)} images in {time.time() - started:.1f}s", flush=True)
  import jax
  import jax.numpy as jnp
  import keras
  from cleannet_tf import backbones
  print("devices", jax.devices(), "keras", keras.__version__, "jax", jax.__version__, flush=True)
  saved = dict(np.load(args.weights)) if args.weights else {}
  if saved:
    order = {p: i for i, p in enumerate(saved["paths"])}
    take = np.array([order[p] for p in paths])
    saved = {k: v[take] for k, v in saved.items() if k != "paths"}

  jobs = []
  for spec in args.jobs.split(","):
    label, weights, epochs = spec.split(":")
    weighting = "loss" if weights.endswith("_loss") else "sampling"
    key = weights.removesuffix("_loss")
    w = None if key == "none" else saved[key].astype(np.float64)
    jobs.append({"name": f"{label}-{weights}-e{epochs}", "label": f"{label}_label",
                 "weights": key, "weighting": weighting, "epochs": float(epochs), "w": w})
  num_jobs = len(jobs)
  totals = np.array([int(round(j["epochs"] * n / BATCH)) for j in jobs], np.int32)

  keras.mixed_precision.set_global_policy(args.policy)
  keras.utils.set_random_seed(args.seed)
  model = backbones.build_classifier(backbones.small_resnet((32, 32, 3)), 10)
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  decays = [not any(t in v.path for t in NO_DECAY) for v in model.trainable_variables]
  print("decayed:", [v.path for v, d in zip(model.trainable_variables, decays) if d][:3],
        "not:", [v.path for v, d in zip(model.trainable_variables, decays) if not d][:3])
  stack = lambda values: [jnp.stack([v] * num_jobs) for v in values]
  state = (stack(trainable), stack(non_trainable), [jnp.zeros((num_jobs,) + v.shape) for v in trainable])

  def augment(x, key):
    k1, k2, k3 = jax.random.split(key, 3)
    b = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    oy = jax.random.randint(k1, (b,), 0, 2 * PAD + 1)
    ox = jax.random.randint(k2, (b,), 0, 2 * PAD + 1)
    crop = jax.vmap(lambda im, a, c: jax.lax.dynamic_slice(im, (a, c, 0), x.shape[1:]))(
        padded, oy, ox)
    flip = jax.random.bernoulli(k3, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1, :], crop)

  def loss_fn(tv, ntv, images, labels, lw):
    logits, ntv = model.stateless_call(tv, ntv, images, training=True)
    logits = logits.astype(jnp.float32)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    correct = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return jnp.sum(lw * ce) / images.shape[0], (ntv, correct)

  def job_step(carry, stream, key, step, x_all, labels, loss_weights, total):
    """One SGD step of one job; stream int32 [S, BATCH] its rows, step a scalar."""
    tv, ntv, mom = carry
    rows = jax.lax.dynamic_index_in_dim(stream, step, keepdims=False)
    images = augment(x_all[rows].astype(jnp.float32), key)
    (loss, (ntv, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        tv, ntv, images, labels[rows], loss_weights[rows])
    # keras.optimizers.schedules.CosineDecay(0.1, total), then SGD as Keras applies
    # it: decoupled decay w -= w * wd * lr, then m = 0.9 m - lr g, w += m.
    progress = jnp.minimum(step.astype(jnp.float32), total) / total
    lr = LEARNING_RATE * 0.5 * (1 + jnp.cos(math.pi * progress))
    new_tv, new_mom = [], []
    for w, g, m, decay in zip(tv, grads, mom, decays):
      if decay:
        w = w - w * WEIGHT_DECAY * lr
      m = MOMENTUM * m - lr * g
      new_tv.append(w + m)
      new_mom.append(m)
    return (new_tv, ntv, new_mom), loss, correct

  # One call per step (Python dispatch runs ahead of the GPU); jobs vmapped.
  train_step = jax.jit(jax.vmap(job_step, in_axes=(0, 0, 0, None, None, 0, 0, 0)),
                       donate_argnums=(0,))

  def job_logits(tv, ntv, images):
    return model.stateless_call(tv, ntv, images.astype(jnp.float32), training=False)[0]
  eval_batch = jax.jit(jax.vmap(job_logits, in_axes=(0, 0, None)))

  def evaluate(state):
    correct = np.zeros(num_jobs)
    for i in range(0, len(x_test), 2000):
      logits = np.asarray(eval_batch(state[0], state[1], x_test_device[i:i + 2000]))
      correct += (logits.argmax(-1) == y_test[i:i + 2000]).sum(-1)
    return correct / len(x_test)

  x_all = jnp.asarray(x_train)
  x_test_device = jnp.asarray(x_test)
  labels = jnp.asarray(np.stack([columns[j["label"]] for j in jobs]))
  loss_weights = jnp.asarray(np.stack([
      j["w"] if (j["w"] is not None and j["weighting"] == "loss") else np.ones(n)
      for j in jobs]).astype(np.float32))
  max_steps = int(totals.max())
  streams = jnp.asarray(np.stack([
      row_stream(np.random.default_rng([args.seed, i]), n, max_steps,
                 j["w"] if j["weighting"] == "sampling" else None)
      for i, j in enumerate(jobs)]))
  key = jax.random.PRNGKey(args.seed)
  curves = {j["name"]: [] for j in jobs}
  eval_every = max(1, int(args.eval_every_epochs * n / BATCH))
  print(f"setup done at {time.time() - started:.1f}s; steps {totals.tolist()}", flush=True)
  step, timed = 0, None
  while step < max_steps:
    key, sub = jax.random.split(key)
    state, loss, correct = train_step(state, streams, jax.random.split(sub, num_jobs),
                                      jnp.int32(step), x_all, labels, loss_weights,
                                      jnp.asarray(totals, jnp.float32))
    step += 1
    if step in (20, 220):
      loss.block_until_ready()
      if step == 20:
        timed = time.time()
      else:
        per_step = (time.time() - timed) / 200
        left = args.budget_s - (time.time() - started) - 40
        if per_step * (max_steps - step) > left:
          # Shrink every job's schedule alike so that the run ends in time.
          totals = np.maximum(step + 1, (totals * left / (per_step * max_steps)).astype(np.int32))
          max_steps = int(totals.max())
        print(f"{per_step * 1000:.2f} ms/step for {num_jobs} jobs "
              f"({num_jobs * BATCH / per_step:.0f} images/s); steps now {totals.tolist()}",
              flush=True)
    if step % eval_every == 0 or step >= max_steps:
      accuracy = evaluate(state)
      for j, a, l, c in zip(jobs, accuracy, np.asarray(loss), np.asarray(correct)):
        curves[j["name"]].append({"epoch": round(step * BATCH / n, 2), "test_top1": float(a),
                                  "loss": float(l), "batch_accuracy": float(c)})
      print(f"[{time.time() - started:.0f}s] step {step}: "
            + " ".join(f"{j['name']}={a:.4f}" for j, a in zip(jobs, accuracy)), flush=True)

  os.makedirs(args.out, exist_ok=True)
  summary = {"jobs": [], "seconds": time.time() - started, "recipe": {
      "batch": BATCH, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM,
      "weight_decay": WEIGHT_DECAY, "pad": PAD, "precision": args.policy}}
  for i, j in enumerate(jobs):
    for v, value in zip(model.trainable_variables, state[0]):
      v.assign(value[i])
    for v, value in zip(model.non_trainable_variables, state[1]):
      v.assign(value[i])
    model.save_weights(os.path.join(args.out, j["name"] + ".weights.h5"))
    summary["jobs"].append({k: v for k, v in j.items() if k != "w"} | {
        "steps": int(totals[i]), "epochs_run": float(totals[i] * BATCH / n),
        "curve": curves[j["name"]], "test_top1": curves[j["name"]][-1]["test_top1"]})
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps([(j["name"], j["epochs_run"], j["test_top1"]) for j in summary["jobs"]]))


if __name__ == "__main__":
  main()
