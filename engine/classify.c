/* classify: being written (placeholder so the build lists it). */
