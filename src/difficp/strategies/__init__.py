"""The ICP steps as strategy objects, one registry per step.

=================  ==============================  ==========================================
config option      registry                        module
=================  ==============================  ==========================================
correspondence     ``CORRESPONDENCES``             :mod:`difficp.strategies.correspondences`
rejection          ``REJECTIONS``                  :mod:`difficp.strategies.rejection`
robust_kernel      ``KERNELS``                     :mod:`difficp.strategies.kernels`
metric             ``METRICS``                     :mod:`difficp.metrics`
solver             ``SOLVERS``                     :mod:`difficp.strategies.solvers`
=================  ==============================  ==========================================

``ICPConfig`` validates its string options against these registries and builds the strategy
objects (:attr:`difficp.config.ICPConfig.strategies`). Each strategy that the compiled path
(:mod:`difficp.fused`) runs has its compiled twin beside it; one it cannot run says why
(``fused_reason``). Codes in the compiled kernel are ``REGISTRY.code(name)``.
"""
