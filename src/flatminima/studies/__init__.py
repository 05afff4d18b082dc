"""flatminima.studies"""
