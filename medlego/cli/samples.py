"""`medlego samples -o DIR`: a synthetic dataset to train on and held-out images to diagnose, so that
every example in the README has its input files."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "samples", help="write a synthetic dataset (.npz) and test images from it as PNG, JPEG and DICOM",
        description="Writes DIR/NAME.npz, a small learnable medical-like dataset in the MedMNIST layout "
                    "(grey 'tissue' with one texture per class), and its first test images as DIR/NAME-I.png, "
                    ".jpg and .dcm with their true labels in DIR/NAME-truth.csv. Test images are never trained "
                    "on, and each image spans the full grey range, so its PNG and its DICOM decode alike.")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write into (created)")
    p.add_argument("--name", default="blood", help="file name stem of the dataset and the images")
    p.add_argument("--classes", type=int, default=4, help="classes (labels class0, class1, …)")
    p.add_argument("--multilabel", action="store_true", help="each class is present or not (several per image)")
    p.add_argument("--size", type=int, default=28, help="image side in pixels")
    p.add_argument("--count", type=int, default=3, help="test images to write as files")
    p.add_argument("--seed", type=int, default=0, help="what the random dataset holds")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import csv
    from pathlib import Path

    import numpy as np

    from medlego.jobs.synthetic import make_synthetic_medmnist, write_image_files
    from medlego.runtime.errors import BadInputError

    if args.classes < 2 or args.size < 8 or not 0 <= args.count <= 60:
        raise BadInputError("need --classes >= 2, --size >= 8 and --count between 0 and 60 (the test split)")
    out = Path(args.output)
    npz = make_synthetic_medmnist(out / f"{args.name}.npz", classes=args.classes, multilabel=args.multilabel,
                                  size=args.size, seed=args.seed, full_range=True)
    with np.load(npz) as data:
        images, labels = data["test_images"][:args.count], data["test_labels"][:args.count]
    truth_file = out / f"{args.name}-truth.csv"
    print(f"wrote {npz} (train 200, val 60, test 60 images, {args.classes} "
          f"{'labels, multi-label' if args.multilabel else 'classes'}, {args.size} px)")
    with open(truth_file, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "label"])
        for i, (img, y) in enumerate(zip(images, labels)):
            # as `medlego train` names classes without --labels; several labels joined by '|'
            truth = "|".join(f"class{c}" for c in (np.flatnonzero(y) if args.multilabel else y.reshape(-1)[:1]))
            paths = write_image_files(img, out / f"{args.name}-{i}")
            for path in paths:
                rows.writerow([path.name, truth])
            print(f"wrote {', '.join(str(p) for p in paths)} (test image {i}, true label: {truth or 'none'})")
    print(f"wrote {truth_file}")
    return 0
