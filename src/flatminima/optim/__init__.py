"""flatminima.optim"""
