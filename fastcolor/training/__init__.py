"""The parts of a training run around the loop (:mod:`fastcolor.train` is the loop itself).

- :mod:`fastcolor.training.config`: :class:`TrainConfig`, every setting checked when it is made;
- :mod:`fastcolor.training.distributed`: this process's rank and device under torchrun;
- :mod:`fastcolor.training.source`: the data source, the trainer's only view of the data;
- :mod:`fastcolor.training.class_prior`: the run's class prior and rarity weights file;
- :mod:`fastcolor.training.checkpoints`: reading, checking and resuming from checkpoints.

None of them imports :mod:`fastcolor.train`; the user-facing names stay importable from there.
"""
