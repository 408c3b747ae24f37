// Runs PixelMed's DicomSRValidator on several files in one JVM (its stylesheets take
// seconds to load; one JVM per file would cost that each time). Prints, per file,
// "=== <path>" then exactly what `DicomSRValidator <path>` prints.
import com.pixelmed.validate.DicomSRValidator;

public class PixelMedSRBatch {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("=== " + path);
            try {
                System.out.print(validator.validate(path));
            } catch (Exception e) {
                System.out.println("Error: validator failed: " + e);
            }
            System.out.println();
        }
    }
}
