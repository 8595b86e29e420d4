"""The fastcolor application, built on the library and never imported by it.

* :mod:`~fastcolor.app.cli`: the ``fastcolor`` command line (argparse and the ``cmd_*`` functions);
* :mod:`~fastcolor.app.colorize_files`: the ``colorize`` pipeline (files in, colorized files out);
* :mod:`~fastcolor.app.weights`: which model file ``--weights`` names;
* :mod:`~fastcolor.app.threads`: how many CPU threads torch gets (the idle cores);
* :mod:`~fastcolor.app.messages`: exit statuses, :class:`~fastcolor.app.messages.CLIError`, notes
  and warnings on stderr;
* :mod:`~fastcolor.app.info`: what ``fastcolor info`` reports;
* :mod:`~fastcolor.app.demo`: ``fastcolor demo``;
* :mod:`~fastcolor.app.bench`: the benchmark driver (``python -m fastcolor.bench``).
"""
