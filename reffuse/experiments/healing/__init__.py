"""The healing study: does distillation recover what fusion costs? (plan, points, findings, report)"""
