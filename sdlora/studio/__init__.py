"""sdlora studio: a local web app to queue, watch, steer and compare trainings."""
