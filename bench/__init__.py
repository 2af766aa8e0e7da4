"""Reproduction suite for "Rethinking ImageNet Pre-training" (He, Girshick, Dollar, ICCV 2019).

Data flows one way: recipe -> RunSpec -> engine -> run dir -> analysis.
"""

__version__ = "0.1.0"
