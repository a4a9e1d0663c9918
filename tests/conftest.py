import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(name="quickstart"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config():
    """The quickstart shrunk to seconds: a 4-feature network on 32x32 images."""
    c = load_config()
    c.model.features = 4
    c.data.shape = (32, 32)
    c.data.num_cells = (4, 8)
    c.data.radius = 3.0
    c.data.num_labeled, c.data.num_unlabeled, c.data.num_test = 2, 2, 2
    c.train.crop = (16, 16)
    c.train.batch, c.train.unlabeled_batch = 2, 2
    c.train.steps, c.train.checkpoint_every, c.train.log_every = 4, 2, 2
    return c
