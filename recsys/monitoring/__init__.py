"""Is the production model still good: live feature and score distributions against each model
version's training baseline, and online quality from what users did with what they saw.

- :mod:`baseline`: a version's training baseline compiled once into bin edges and lookup
  tables (:class:`BaselineBins`), and the vectorised binning of a whole batch;
- :mod:`stage`: the ``monitor`` stage of the request path (bin counts per version x arm);
- :mod:`windows`: the sliding windows those counts accumulate in, and their statistics;
- :mod:`statistics`: PSI, Jensen-Shannon, Wilson intervals;
- :mod:`summaries`: window summaries persisted as JSON lines (what the report plots);
- :mod:`quality`: online CTR, order rate and NDCG@20 from joined outcomes;
- :mod:`report`: the static HTML report.

Nothing here knows gRPC or Prometheus: the server adapts (``recsys/serving/drift_metrics.py``).
"""
