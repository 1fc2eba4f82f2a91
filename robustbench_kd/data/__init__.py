"""Data: the embedded digits, CIFAR-10/100, ImageNet folders, generated-data mixing, and batching.

* :mod:`.datasets`: ``DataSplits``, the built-in dataset loaders, batch iteration and per-epoch generators;
* :mod:`.cifar`: CIFAR batches read without executing code; :mod:`.imagenet`: ImageNet folders;
* :mod:`.extra`: mixing a fraction of generated images into every batch; :mod:`.npz_mmap`: memory-mapped npz.

May import only the layers below it: the core plugin API, ``storage`` and ``errors``; never a subsystem
(``zoo``, ``scale``, ``students``, ``methods``, ``evaluation``, ...), which all may import this package.
"""
