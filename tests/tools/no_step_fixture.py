"""A test-only trainer with no train step: `mmjax.tools.aot` must refuse it with one line."""


def run(config, workdir):
  del config, workdir
