#!/usr/bin/env bash
# Pull a few classes out of the ImageNet training tar, for a quick look, without extracting the rest.
#
#   ./extract_some_samples.sh TAR DEST [N_CLASSES] [N_IMAGES]
#   e.g. ./extract_some_samples.sh /datasets/ILSVRC2012_img_train.tar $WRKDIR/imagenet-peek 10 20
#
# TAR is ILSVRC2012_img_train.tar: one tar per class (nXXXXXXXX.tar), each holding nXXXXXXXX_NNNN.JPEG.
# DEST gets DEST/nXXXXXXXX/*.JPEG for the first N_CLASSES classes (default 10), N_IMAGES each (default 10).
# Only those class tars are read: tar seeks past the others, so this takes seconds, not the hours a full
# extraction of 1.2 million files takes on a shared filesystem.
set -euo pipefail

usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,1\}//' >&2; }
if [ $# -lt 2 ] || [ $# -gt 4 ]; then
  usage
  exit 2
fi
tar_file=$1 dest=$2 n_classes=${3:-10} n_images=${4:-10}
for n in "$n_classes" "$n_images"; do
  if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "ERROR: N_CLASSES and N_IMAGES must be positive integers, got '$n'" >&2
    usage
    exit 2
  fi
done
if [ ! -f "$tar_file" ]; then
  echo "ERROR: no such tar file: $tar_file" >&2
  exit 1
fi

# the first N class tars, in archive order (head stops the listing early: ignore tar's SIGPIPE)
classes=$(tar -tf "$tar_file" 2>/dev/null | grep -E '^n[0-9]+\.tar$' | head -n "$n_classes"; true)
if [ -z "$classes" ]; then
  echo "ERROR: $tar_file holds no per-class tars (nXXXXXXXX.tar): is it ILSVRC2012_img_train.tar?" >&2
  exit 1
fi
mkdir -p "$dest"
for class_tar in $classes; do
  wnid=${class_tar%.tar}
  mkdir -p "$dest/$wnid"
  # stream this class's tar out of the big one, keep its first N images
  images=$(tar -xOf "$tar_file" "$class_tar" 2>/dev/null | tar -t 2>/dev/null | head -n "$n_images"; true)
  # shellcheck disable=SC2086
  tar -xOf "$tar_file" "$class_tar" | tar -x -C "$dest/$wnid" $images
  echo "$wnid: $(find "$dest/$wnid" -name '*.JPEG' | wc -l) images"
done
echo "extracted $(echo "$classes" | wc -l) classes into $dest"
