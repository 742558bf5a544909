"""Training package: datasets in the official layouts, a synthetic generator, sampling,
augmentation and re-id metrics. Kept import-light: submodules pull in torch/cv2 only when used."""
