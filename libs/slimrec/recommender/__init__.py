"""The recommender of SLIM: sequential backbones, SLIM's fusions, priors, and honest evaluation.

Modules, in the order data flows through them:

* :mod:`config`      ``RecommenderConfig`` (every knob, with a description; defaults = the dev run).
* :mod:`data`        pandas tables -> ``RecData`` (numpy CSR sequences, item text and rationale vectors,
                     grounded items); leave-one-out splits; training rows.
* :mod:`models`      SASRec, GRU4Rec, SR-GNN; item text fusion ``z_i = g_f([g_l(text_i); id_i])``; rationale
                     fusion on the user side (``concat`` as in the paper, or a zero-initialised ``gated``
                     residual); ID-agnostic text matching.
* :mod:`priors`      transition counts from training histories (leave-own-user-out on training rows) and the
                     rationale's grounded items, as score priors.
* :mod:`train`       fits with early stopping on validation NDCG@10 (BCE with sampled negatives, BPR, CE).
* :mod:`evaluation`  both protocols, vectorised; prior weights chosen on validation only.
* :mod:`metrics`     HR@k, NDCG@k, MRR with ties counted as expected under random tie-breaking.
* :mod:`beyond`      what the top-K lists hold: catalogue coverage, Gini, popularity percentile, novelty,
                     intra-list diversity (test split, full ranking).
* :mod:`runner`      variants x seeds of one backbone (a group), baselines, result tables.
* :mod:`experiment`  the whole run as one Ray Train ``TorchTrainer`` job (or in process), checkpoints,
                     recommendations of the best variant.

Evaluation rule (everywhere): under full ranking the target competes with every item except those of the
user's history before the target (test: history + the validation item); under ``sampled100`` with 100
negatives drawn uniformly, seeded, from items outside the user's whole sequence.
"""
