"""`compress pipeline`, split into its stages: ``options`` -> training ``stages`` (the scratch baseline in a second
process, ``scratch_process``) -> ``deliver`` (bundles, registration) -> the report; ``run`` orchestrates them.

Nothing is imported here: the scratch process is spawned by module path, and starts faster without ``run``'s
imports (export, serving, the report).
"""
