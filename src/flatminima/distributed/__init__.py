"""flatminima.distributed"""
