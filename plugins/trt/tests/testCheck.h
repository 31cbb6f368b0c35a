// CHECK(cond, printf-style message...) for the plugin test programs: counts checks, prints each
// failure with its file, line and condition; main() reports gChecks / gFailures and exits 1 if any.

#ifndef KVZAP_TEST_CHECK_H_
#define KVZAP_TEST_CHECK_H_

#include <cstdio>

inline int gFailures = 0, gChecks = 0;

#define CHECK(cond, ...)                                                \
    do {                                                                \
        ++gChecks;                                                      \
        if (!(cond)) {                                                  \
            ++gFailures;                                                \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            std::printf(__VA_ARGS__);                                   \
            std::printf("\n");                                          \
        }                                                               \
    } while (0)

#endif  // KVZAP_TEST_CHECK_H_
