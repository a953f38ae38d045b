// The CHECK macro of the C++ unit tests: count a failure with its file and line, keep going.
#pragma once

#include <iostream>

static int failures = 0;
#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed\n";   \
            ++failures;                                                                  \
        }                                                                                \
    } while (0)
