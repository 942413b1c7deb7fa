"""The model's lifecycle: versions on disk, the folded scorer that serves them, and who is champion.

    metadata      what a version's metadata.json holds; ModelError
    scorecard     the folded logistic scorer (plain Python: no numpy, no scikit-learn)
    policy        probability -> decision (cut-off, referral band), risk band and score
    registry      MODEL_DIR: version folders, their verification and loading
    pipeline      the scikit-learn side: training pipelines, folding, unpickling (imported
                  only by training, the boosting challenger's process and tests)
    challenger    the challenger's bounded queue, scored off the response path
    boosting      the child process that serves a boosting challenger
    assignment    champion and challenger of one worker, and how changes reach it

A worker serving a logistic champion never imports numpy or scikit-learn: the
scorecard is verified by hashes and a self-check against recorded probabilities.
"""
