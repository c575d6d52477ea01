"""Result records -> a static leaderboard site (pure, deterministic), and a localhost server.

``leaderboard/results/<task>/<submission>.json`` (test split) and ``<submission>.train.json``
(train split) are the source of truth. :func:`metabench.site.build.build` turns them into
plain HTML pages with inline CSS, hand-written SVG plots and one small inline script that
sorts the rank table:

``index.html``
    every task with its top three rules by IQM on the test split
``tasks/<task>.html``
    the rank table, probability of improvement over the task's baseline, interval-estimate
    plots, performance profiles, IQM learning curves, per-env scores and the stale results
``submissions/<task>/<submission>.html``
    one page per submission and task: metadata, disclosure, scores, curves, checks, downloads
``data/<task>/<submission>.{json,train.json,csv}``
    the raw records, byte for byte, and one CSV row per run

The modules, lowest first: :mod:`~metabench.site.model` reads records and specs and ranks
them, :mod:`~metabench.site.svg` draws the plots, :mod:`~metabench.site.pages` renders the
Jinja2 templates in ``templates/`` (with the CSS and script in ``static/``),
:mod:`~metabench.site.build` writes the site and :mod:`~metabench.site.serve` serves it.

Properties kept:

* The same records give byte-identical files: nothing depends on the clock, the machine or the
  order the filesystem lists files in, and every bootstrap is seeded from ``seed`` and the
  names of what it compares (so adding a submission leaves everyone else's numbers alone).
* Every string of a record may be hostile: the templates autoescape all text, in attributes
  too, only http(s) links become hrefs, file names are slugs that cannot leave the output
  folder, and each page carries a Content-Security-Policy that allows only its own (hashed)
  script and no network access.
* A record whose task fingerprint differs from the current spec is never ranked; it is listed
  as stale with the reason.

The package imports none of its modules (importing one runs this file first, so a re-export
here would import them in a circle).
"""
