"""What only pretraining uses (``training/train_unconditional.py``): the loss and step (``training_step``),
``checkpoint-N`` folders (``checkpoints``), the JSON-lines tracker (``tracking``) and the probe monitor
(``monitor``)."""
