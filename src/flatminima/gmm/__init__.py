"""flatminima.gmm"""
