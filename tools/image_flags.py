"""Flags naming an image source, shared by the image tools.

Exactly one of --manifest, --image_folder or --tfds names the images;
importing this module defines the flags.
"""

from absl import flags

from cleannet_tf import data, images
from cleannet_tf.errors import InputError

flags.DEFINE_string("manifest", None,
                    "CSV/TSV with header columns path, label and optional "
                    "verification (1/0/-1, empty = -1) and key.")
flags.DEFINE_string("image_folder", None, "Folder with one sub-folder per class.")
flags.DEFINE_string("tfds", None, "TFDS dataset name, e.g. cifar10_n.")
flags.DEFINE_string("tfds_split", "train", "TFDS split, e.g. train or test[:10%].")
flags.DEFINE_string("tfds_label_key", "label",
                    "TFDS feature holding the noisy label; for cifar10_n use "
                    "worse_label or aggre_label ('label' is the clean one).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")
flags.DEFINE_string("class_names", None,
                    "classes.txt (one name per line, line i = class id i); "
                    "default: from the labels or folders.")
FLAGS = flags.FLAGS


def class_names():
  """Class names from --class_names, or None."""
  return data.read_class_names(FLAGS.class_names) if FLAGS.class_names else None


def source_from_flags():
  """The ImageSource that the flags name."""
  given = [name for name in ("manifest", "image_folder", "tfds")
           if getattr(FLAGS, name)]
  if len(given) != 1:
    raise InputError("give exactly one of --manifest, --image_folder, --tfds "
                     f"(got {', '.join('--' + g for g in given) or 'none'})")
  if FLAGS.manifest:
    return images.read_manifest(FLAGS.manifest, class_names())
  if FLAGS.image_folder:
    return images.folder_manifest(FLAGS.image_folder, class_names())
  return images.tfds_source(FLAGS.tfds, FLAGS.tfds_split, FLAGS.tfds_label_key,
                            FLAGS.tfds_data_dir)
