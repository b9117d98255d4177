"""The simulator (``dejavu simulate``): a discrete-event model of the baseline and disaggregated pipelines.

- ``costs``  — what each step costs: constants (closed form) or a profile priced for a layer split;
- ``engine`` — the event loop, with the real workers' scheduling rules, swapping and failures;
- ``sweep``  — every split of D machines over a range of rates, plotted (the paper's Appendix B);
- ``cli``    — the command line.
"""
